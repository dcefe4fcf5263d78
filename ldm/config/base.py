"""The base of every config section, and what marks a field as a knob."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

# A knob: a setting that changes how fast or where a stage runs, not what it writes. Stages leave knobs
# out of their output's identity (ldm/stage.py), so a killed run resumes under other parallelism.
KNOB = {"identity": False}


class Section(BaseModel):
    """Base for every config section: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)
