"""dogtl's version, in the lowest layer so that every module can name it without importing the
package (whose `__init__` loads the API, and with it every stage)."""

__version__ = "0.1.0"
