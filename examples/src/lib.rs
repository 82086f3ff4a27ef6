//! Runnable examples of the metainf crates: see the folders beside this one.
