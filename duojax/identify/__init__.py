"""Head identification: gate training (duo), training-free scores, and imports of other methods' files."""
