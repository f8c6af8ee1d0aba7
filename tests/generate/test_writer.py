"""The predict writer's progress display."""


def test_progress_bar_shows_titles_per_second():
    from types import SimpleNamespace

    from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar
    from rich.progress import Progress

    from titlegen.generate.writer import show_rate

    rich = RichProgressBar()
    rich.progress = Progress(disable=True)
    rich.predict_progress_bar_id = rich.progress.add_task("Predicting", total=3)
    show_rate(SimpleNamespace(progress_bar_callback=rich), 64, 12.5)
    assert rich.progress.tasks[0].description == "Predicting (64 titles, 12.50 titles/s)"

    tqdm_bar = TQDMProgressBar()
    tqdm_bar.predict_progress_bar = tqdm_bar.init_predict_tqdm()
    show_rate(SimpleNamespace(progress_bar_callback=tqdm_bar), 64, 12.5)
    assert "12.50 titles/s" in tqdm_bar.predict_progress_bar.postfix
