"""The streaming index: the vector store, the exact delta, re-ranking, and the rebuilt approximate structures."""
