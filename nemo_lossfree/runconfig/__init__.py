"""The YAML run-config format: ``load`` reads a file into sections, ``validate``
checks them against Megatron-Core's and this project's rules before any GPU
time is spent (``megatron_fields`` lists Megatron's field names)."""
