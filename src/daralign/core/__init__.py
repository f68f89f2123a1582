"""The small core every room builds on: settings (config), parsing of YAML and flags, the
dataclasses rooms exchange (types), model and data loading, errors. Imports nothing from the rooms."""
