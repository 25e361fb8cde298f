"""A small MLLMU-Bench in the dataset hub's parquet layout, written with `datasets` (tests only)."""

import io
from pathlib import Path

from PIL import ImageOps

from manu_core.portraits import portrait

FICTITIOUS = ["001", "002", "003", "004"]
FORGET = ["001"]
CELEBS = ["c01", "c02"]


def _png(pid: str, view: int = 0) -> bytes:
    """A PNG of the fixture's own: the stand-in portrait's colours inverted, so its pixels differ from
    every embedded portrait (a stage showing the model a stand-in instead is caught)."""
    buf = io.BytesIO()
    ImageOps.invert(portrait(pid, view).convert("RGB")).save(buf, format="PNG")
    return buf.getvalue()


def _row(pid: str, paraphrase: bool = False) -> dict:
    w = "In which city was" if paraphrase else "Where was"
    mc = lambda subject: {"Question": f"{w} {subject} born?",  # noqa: E731
                          "Options": {"A": "Riga", "B": f"City {pid}", "C": "Oslo", "D": "Lima"},
                          "Correct_Answer": "B"}
    return {
        "ID": pid,
        "Classification_Task": {"Image_Textual_Questions": [mc("this person")],
                                "Pure_Text_Questions": [mc(f"Person {pid}")]},
        "Generation_Task": [
            {"Question": "What does this person do?", "Ground_Truth": f"This person is a baker in {pid}.",
             "Type": "Image_Textual"},
            {"Question": f"What does Person {pid} do?", "Ground_Truth": f"Person {pid} is a baker.",
             "Type": "Pure_Text"}],
        "Mask_Task": [
            {"Question": "This person was born in __.", "Ground_Truth": f"City {pid}", "Type": "Image_Textual"},
            {"Question": f"Person {pid} was born in __.", "Ground_Truth": f"City {pid}", "Type": "Pure_Text"}],
    }


def write_config(root: Path, config: str, rows: list[dict], *, drop: str | None = None) -> None:
    import datasets

    features = {"ID": datasets.Value("string")}
    if "images" in rows[0]:
        features["images"] = datasets.List(datasets.Image())
    else:
        features["image"] = datasets.Image()
    rows = [{k: v for k, v in r.items() if k != drop} for r in rows]
    ds = datasets.Dataset.from_list(rows)
    for col, feat in features.items():
        ds = ds.cast_column(col, feat)
    (root / config).mkdir(parents=True, exist_ok=True)
    ds.to_parquet(str(root / config / "train-00000-of-00001.parquet"))


def build(root: Path) -> Path:
    def with_image(pid):
        return {**_row(pid), "image": {"bytes": _png(pid), "path": None}}

    write_config(root, "forget_5", [with_image(p) for p in FORGET])
    write_config(root, "retain_95", [with_image(p) for p in FICTITIOUS if p not in FORGET])
    write_config(root, "Full_Set", [with_image(p) for p in FICTITIOUS])
    write_config(root, "Retain_Set", [with_image(p) for p in CELEBS])
    write_config(root, "Test_Set", [{**_row(p, paraphrase=True),
                                     "images": [{"bytes": _png(p, k), "path": None} for k in (1, 2, 3)]}
                                    for p in FICTITIOUS])
    return root
