"""The errors this package raises (they live in :mod:`langchain_localllms.core.errors`)."""

from langchain_localllms.core.errors import *  # noqa: F403
from langchain_localllms.core.errors import __all__  # noqa: F401
