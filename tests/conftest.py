def pytest_addoption(parser):
    parser.addoption("--regen-golden", action="store_true",
                     help="rewrite tests/golden's expected files from the current code (review "
                          "the diff before committing it)")
