"""The methods the stages use, with no run-folder IO: MinHash + ROUGE-L, metrics, pairwise verdicts, reference metrics, the likelihood judge."""
