"""The synthetic shapes world: :mod:`.world` draws scenes of coloured shapes, stick figures, text-to-image pairs and
edit triplets; :mod:`.writers` writes them as datasets in the formats the readers of :mod:`vllm2.data` accept, and
the demo's samples. Their rule-based image judges live in :mod:`vllm2.bench.image_judges`.
"""

from .world import (
    COLOURS,
    KEYPOINTS,
    NUMBERS,
    PLAIN,
    QUESTION_TYPES,
    SHAPES,
    SIZES,
    SKELETON,
    EditExample,
    Figure,
    FigureScene,
    Scene,
    Shape,
    caption,
    make_edit,
    make_figures,
    make_scene,
    make_t2i,
    referring_expressions,
    vqa_questions,
)
from .writers import DEMO_FILES, GENERATOR_VERSION, semantic_label_map, write_dataset, write_demo

__all__ = ["COLOURS", "DEMO_FILES", "GENERATOR_VERSION", "KEYPOINTS", "NUMBERS", "PLAIN", "QUESTION_TYPES", "SHAPES",
           "SIZES", "SKELETON", "EditExample", "Figure", "FigureScene", "Scene", "Shape", "caption", "make_edit",
           "make_figures", "make_scene", "make_t2i", "referring_expressions", "semantic_label_map", "vqa_questions",
           "write_dataset", "write_demo"]
