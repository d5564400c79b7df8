"""The GitHub Action's two steps, `assay action main` and `assay action post`, which action/*.js launch."""
