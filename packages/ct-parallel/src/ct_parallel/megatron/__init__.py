"""The megatron-core engine. Importing anything here imports megatron-core (~20 s); ct_parallel
itself imports this subpackage only when a run asks for ``engine: megatron``."""
