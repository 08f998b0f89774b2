"""The fxpress version: recorded in artifacts, which refuse to load under another one."""

VERSION = "0.1.0"
