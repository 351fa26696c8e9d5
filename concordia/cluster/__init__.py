"""Concordia on a cluster: decode workers and warm standbys as Ray actors, a recovery
coordinator, tensor-parallel jobs (torch.distributed). Needs the `cluster` extra (Ray) and torch.
"""
from .coordinator import FailoverPlan, RecoveryCoordinator, run_failover, start_ray

__all__ = ["FailoverPlan", "RecoveryCoordinator", "run_failover", "start_ray"]
