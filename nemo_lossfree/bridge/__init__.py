"""Megatron-Bridge entry points (``python -m nemo_lossfree.bridge.pretrain``)."""
