"""The default demo model: a tiny DiffusionGemma trained on 4x4 Sudoku completion (see ``train``)."""
