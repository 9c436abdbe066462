"""Where jobs run: ``local`` (this process) and ``ray`` (a pool of Ray workers, imported only with --ray)."""
