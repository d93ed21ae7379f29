"""Weight sync from the learner to the rollout replicas over a torch.distributed group.

- `plan_buckets` lays parameters out in size-capped flat byte buckets (`WeightManifest`).
- `WeightSender` (learner, rank 0) / `WeightReceiver` (replica, rank > 0) move them.
- `WeightSyncCoordinator` drives one update: control RPCs to each replica's
  RolloutService plus the broadcast, and rebuilds the group when replicas change.

Transport-free except for torch.distributed; see docs/weight-sync.md.
"""
from instructrl.weight_sync.coordinator import SyncResult, WeightSyncCoordinator, plan_ranks
from instructrl.weight_sync.manifest import ALIGN, param_meta, plan_buckets, total_bytes
from instructrl.weight_sync.transport import WeightReceiver, WeightSender

__all__ = ["ALIGN", "SyncResult", "WeightReceiver", "WeightSender", "WeightSyncCoordinator",
           "param_meta", "plan_buckets", "plan_ranks", "total_bytes"]
