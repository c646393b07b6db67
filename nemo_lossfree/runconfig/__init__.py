"""The YAML run-config format: ``load`` reads a file into sections, ``validate``
checks them before any GPU time is spent: Megatron-Core's model rules by building
its ``TransformerConfig`` (``transformer_config``), the rest ours
(``megatron_fields`` lists the ``model:`` keys Megatron knows)."""
