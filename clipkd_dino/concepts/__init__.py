"""Concept pools from caption corpora (`clipkd concepts`): caption sources read as streams (`sources`), cleaned
(`clean`), parsed with spaCy into concept mentions (`parser`, word lists in `lexicon`), counted and ranked into a
pool (`build`); the pool file, ranking and merging (`pool`)."""
