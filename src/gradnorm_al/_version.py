"""The package version, at the bottom so that any module can name it without importing the
package (whose __init__ imports most modules)."""

__version__ = "0.1.0"
