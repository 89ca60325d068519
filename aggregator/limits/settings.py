"""The config sections of the charge limits: `limits` (stability and safety) and `ir` (when an internal-resistance
estimate is used). The controller reads them; the config model composes them."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class IrOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    maxPercentageError: float = Field(0.1, gt=0, le=1, description="largest relative error of an IR estimate "
                                      "that is still used (0.1 = 10%)")
    minVoltageChange: float = Field(0.02, ge=0, le=5, description="smallest voltage change (V) between samples "
                                    "for an IR fit")


class LimitOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    rampUpRate: float = Field(2.0, gt=0, le=1000, description="A/s a current limit may rise by (drops are "
                              "immediate), so DVCC does not hunt; faster when rampUpTime asks for it")
    rampUpTime: float = Field(30.0, gt=0, le=3600, description="seconds a current limit takes at most to rise "
                              "from 0 to its target: a large bank rises faster than rampUpRate")
    hysteresis: float = Field(1.0, ge=0, le=100, description="A: a current limit rises only by at least this")
    voltageRampUpRate: float = Field(0.05, gt=0, le=10, description="V/s the charge voltage limit may rise by")
    voltageHysteresis: float = Field(0.02, ge=0, le=5, description="V: the charge voltage limit rises only by "
                                     "at least this")
    overCurrentTolerance: float = Field(0.02, ge=0, le=0.5, description="a member above its own limit by more "
                                        "than this fraction has its share corrected at once")
    shareTimeConstant: float = Field(600.0, gt=0, le=2592000, description="seconds over which learned shares "
                                     "and over-current corrections fade")
    staleAfter: float = Field(60.0, gt=0, le=3600, description="seconds without an update before a member is "
                              "stale (counted as carrying nothing in the limits)")
    testCurrentInterval: float = Field(60.0, gt=0, le=3600, description="seconds the bank's limit stays at 0 A for a "
                                 "member that forbids the direction but still takes current in it, before a small "
                                 "test current shows whether it is still connected")
