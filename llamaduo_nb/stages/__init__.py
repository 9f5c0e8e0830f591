"""The seven stages: each module is one stage's run-folder IO and units (notebook 0N_<stage>, folder <stage>/)."""
