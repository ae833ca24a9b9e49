"""The wire protocol of the distributed mode: versioned pydantic messages and every task,
queue and key name. Imports neither torch nor anything heavy (checked by a test)."""

from shared.protocol.messages import (BlobRef, DeadLetter, Message, PolicyPublished, RewardJob,
                                      SampleItem, SampleJob, SamplingParams, ScoredBatch, Trajectory,
                                      other_start, sample_id)
from shared.protocol.names import (DEFAULT_KEY_PREFIX, PROTOCOL_VERSION, QUEUE_REWARD, QUEUE_SAMPLE,
                                   TASK_REWARD, TASK_SAMPLE, RunKeys)

__all__ = ["BlobRef", "DeadLetter", "Message", "PolicyPublished", "RewardJob", "SampleItem",
           "SampleJob", "SamplingParams", "ScoredBatch", "Trajectory", "other_start", "sample_id",
           "DEFAULT_KEY_PREFIX", "PROTOCOL_VERSION", "QUEUE_REWARD", "QUEUE_SAMPLE", "TASK_REWARD",
           "TASK_SAMPLE", "RunKeys"]
