"""spd_optax: Selective Projection Decay for robust fine-tuning, in optax.

Users only ever type ``spd_optax.<name>``.
"""

from spd_optax._anchors import AnchorSpec
from spd_optax._anchors import set_anchor
from spd_optax._diagnostics import diagnostics_summary
from spd_optax._diagnostics import get_diagnostics
from spd_optax._diagnostics import projected_fraction
from spd_optax._ftp import adamftp
from spd_optax._ftp import fast_trainable_projection
from spd_optax._ftp import ftp_diagnostics_summary
from spd_optax._ftp import FTPState
from spd_optax._l2sp import adaml2sp
from spd_optax._l2sp import l2sp
from spd_optax._l2sp import L2SPState
from spd_optax._masks import exclude_paths
from spd_optax._masks import KEY_BIAS_PATTERN
from spd_optax._masks import LeafFlags
from spd_optax._spd import adamspd
from spd_optax._spd import projection_decay
from spd_optax._spd import ProjectionDiagnostics
from spd_optax._spd import selective_projection_decay
from spd_optax._spd import SPDState

__version__ = "0.1.0"

__all__ = (
    "AnchorSpec",
    "FTPState",
    "KEY_BIAS_PATTERN",
    "L2SPState",
    "LeafFlags",
    "ProjectionDiagnostics",
    "SPDState",
    "adamftp",
    "adaml2sp",
    "adamspd",
    "diagnostics_summary",
    "exclude_paths",
    "fast_trainable_projection",
    "ftp_diagnostics_summary",
    "get_diagnostics",
    "l2sp",
    "projected_fraction",
    "projection_decay",
    "selective_projection_decay",
    "set_anchor",
)
