# The C module behind `signal`: the same functions and constants, without the enum wrappers.
from signal import *  # noqa: F403
