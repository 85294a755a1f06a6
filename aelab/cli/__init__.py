"""The command line: argv to commands, the checked overrides, run and sweep dirs, one training job. May use all."""
