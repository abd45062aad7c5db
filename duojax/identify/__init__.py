"""Head identification: gate training (duo), training-free scores, other methods' pattern files."""
