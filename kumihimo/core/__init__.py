"""The foundation every stage stands on: typed config trees, user errors, the log channel (logs.py),
progress lines, record readers, atomic writes.

Nothing here imports a stage (`kumihimo.data_prep`, `kumihimo.tokenizer`, `kumihimo.pretrain`) or the
command line on top of them; the import arrows run from the CLI down to the stages and from the stages
down to this package, never back up.
"""
