"""instructrl: online RLHF (InstructGPT's SFT -> RM -> PPO) as independent gRPC services."""

__version__ = "0.1.0"
