"""What the Snakefile plans with: config validation and job resources. No stage imports these."""
