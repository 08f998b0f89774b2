"""The ground floor: errors, environment flags, counters, logs, the version, and the Triton type
table. Imports nothing of fxpress."""
