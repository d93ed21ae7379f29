"""The cluster test bed: the pods of the rendered Helm chart as real processes on simulated
hosts of one machine (see tests/cluster/README.md)."""
from .cluster import Cluster, ClusterError
from .fabric import remove_leftovers
from .kubelet import KubeletConfig

__all__ = ["Cluster", "ClusterError", "KubeletConfig", "remove_leftovers"]
