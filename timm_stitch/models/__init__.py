"""Registered ``snnet_*`` architectures, one module per anchor family (importing them registers them in timm)."""
from . import snnet_deit  # noqa: F401
from . import snnet_vit_fmnist  # noqa: F401
from . import snnet_swin  # noqa: F401
from . import snnet_resnet  # noqa: F401
from . import snnet_levit  # noqa: F401
from . import snnet_generic  # noqa: F401
from . import snnet_deit3  # noqa: F401
from . import snnet_zoo  # noqa: F401
