"""``nemo-lossfree report``'s pictures: a run's TensorBoard events as a heatmap and balance curves.

``events.py`` reads the ``lossfree/...`` scalars and load matrices of any run
that wrote them through ``integrations/logging.py`` (the demo, Megatron-LM,
Megatron-Bridge); ``figure.py`` draws them.
"""
