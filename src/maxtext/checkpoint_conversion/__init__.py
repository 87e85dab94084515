"""HF <-> our parameter conversion: one name table, scan stacking, config translation."""
