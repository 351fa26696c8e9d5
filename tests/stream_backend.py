"""A backend for tests of the checkpoint writer's stream path on a machine without a GPU."""
from concordia import Runtime
from concordia.backends.reference import ReferenceBackend


class InOrderStreams(ReferenceBackend):
    """The reference interpreter with streams and graphs whose work completes as it is
    enqueued (a valid, if slow, stream): it runs the writer's stream path (ring slots, page
    lists, gathers into mapped staging, the capture plan, release) on the CPU box. It makes
    no claim about cuda: the cuda tests do that, on a GPU."""
    streams = graphs = True

    def __init__(self, device=None):
        super().__init__(device)
        self.graphs_made = self.graphs_destroyed = 0

    def capture(self, *records, first=None):
        self.graphs_made += 1
        return first, records

    def launch_graph(self, graph, stream):
        first, records = graph
        if first is not None:
            first(stream)
        for record in records:
            record(stream)

    def destroy_graph(self, graph):
        self.graphs_destroyed += 1


def stream_runtime() -> Runtime:
    """A reference Runtime whose backend is InOrderStreams."""
    rt = Runtime("reference")
    rt.backend = InOrderStreams()
    return rt
