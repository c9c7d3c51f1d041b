"""Frank-Wolfe merging for mergekit.

Kept import-light on purpose: the start-up hook imports this package in every
Python process, so nothing heavy (torch, mergekit) may be imported here.
"""

__version__ = "0.1.0"
METHOD_NAME = "frank_wolfe"
