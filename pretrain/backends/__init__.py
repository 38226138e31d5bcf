"""Parallel backends behind one interface: single, ddp, fsdp, deepspeed."""
