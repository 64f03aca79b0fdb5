from .base import ArchitectureAdapter, adapter_by_family, all_adapters, get_adapter, register, supported_families  # noqa
