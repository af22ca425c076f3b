"""The brainsurgeon error hierarchy.

Every error names what went wrong, where (module name, value), the constraint, and the fix::

    >>> raise CalibrationError("layer 'fc1' was never reached by the calibration data; "
    ...                        "check that calib feeds the model's forward, or pass ignore=['fc1']")
"""

from __future__ import annotations


class BrainsurgeonError(Exception):
    """Base class of every error raised on purpose by brainsurgeon."""


class ConfigError(BrainsurgeonError, ValueError):
    """A config, recipe or argument is invalid (names the field, the allowed range, the fix)."""


class CalibrationError(BrainsurgeonError):
    """Calibration data is empty, non-finite, mis-shaped, or never reaches a layer."""


class UnsupportedModuleError(BrainsurgeonError, TypeError):
    """A module or weight type that the requested method cannot handle."""


class NumericalError(BrainsurgeonError, ArithmeticError):
    """A Hessian stayed singular after all damping retries, or a solver produced NaN/Inf."""


class BudgetInfeasibleError(BrainsurgeonError):
    """No plan reaches the requested budget (names the cheapest reachable cost)."""


class MissingDataError(BrainsurgeonError, ModuleNotFoundError):
    """A data set's package is not installed (the message says what to ``pip install``)."""


class UnsupportedOpError(BrainsurgeonError, TypeError):
    """An operator without a dependency rule blocks structural pruning through its dims."""


class SurgeryError(BrainsurgeonError, RuntimeError):
    """Physical removal failed verification; the model was restored (names the op/module/attribute)."""


class FormatError(BrainsurgeonError, ValueError):
    """A saved model/manifest/shard is corrupt, truncated, pickled, or does not match the model."""
