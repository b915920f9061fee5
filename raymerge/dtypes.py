"""dtype names across the recipe and safetensors. Plain tables: importing this loads no torch."""

from __future__ import annotations

RECIPE_TO_CODE = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16"}
CODE_TO_RECIPE = {code: name for name, code in RECIPE_TO_CODE.items()}
ITEM_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}
