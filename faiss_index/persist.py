def save_index(*a, **k): raise NotImplementedError
def load_index(*a, **k): raise NotImplementedError
def index_stats(*a, **k): raise NotImplementedError
