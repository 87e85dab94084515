"""HF <-> our parameter conversion: one name table, scan stacking, streaming I/O, the model record.

The HF config.json <-> config keys translation is configs/hf_config.py (the config loader reads it).
"""
