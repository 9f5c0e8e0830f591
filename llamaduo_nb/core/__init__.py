"""The ground floor: params and the params file, the row schemas, the run folder and its unit contract, where units
run, files, errors, progress bars, prompts and where local models come from. It imports nothing of ours from above."""
