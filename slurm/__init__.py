"""The shipped batch scripts and site profiles (package data only): this folder installs as
`kumihimo.slurm_templates` (pyproject.toml's package-dir mapping); `kumihimo.slurm` renders them."""
