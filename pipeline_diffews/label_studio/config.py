"""A Label Studio labelling config, as far as the backend needs it: its brush and polygon controls, their labels, and
the image each one draws on.

    <View>
      <Image name="image" value="$image"/>
      <BrushLabels name="tag" toName="image"><Label value="scratch"/><Label value="dent"/></BrushLabels>
      <PolygonLabels name="outline" toName="image"><Label value="scratch"/></PolygonLabels>
    </View>

A label is a class: the same label name in several controls (a brush and a polygon control, say) is one class.
"""

from __future__ import annotations

import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass

CONTROL_TYPES = {"brushlabels": "brushlabels", "polygonlabels": "polygonlabels"}  # tag (lowercase) -> result type


class LabelConfigError(ValueError):
    """A labelling config the backend cannot work with; the message is one line naming the problem."""


@dataclass(frozen=True)
class Control:
    """One brush or polygon control: `name` (the result's from_name), `type` ("brushlabels" or "polygonlabels"),
    `to_name` (the image's name), `data_key` (the task data field holding the image URL) and its `labels`."""

    name: str
    type: str
    to_name: str
    data_key: str
    labels: tuple[str, ...]


@dataclass(frozen=True)
class LabelConfig:
    """The brush and polygon controls of a labelling config, in the config's order."""

    xml: str
    controls: tuple[Control, ...]

    @property
    def labels(self) -> list[str]:
        """Every label of every control once, in the config's order: the classes."""
        return list(dict.fromkeys(label for control in self.controls for label in control.labels))

    def control(self, name: str) -> Control | None:
        return next((c for c in self.controls if c.name == name), None)

    @property
    def data_keys(self) -> list[str]:
        """The task data fields that hold the images the controls draw on (usually one, "image")."""
        return list(dict.fromkeys(c.data_key for c in self.controls))


def parse_label_config(xml: str) -> LabelConfig:
    """Reads the brush (`BrushLabels`) and polygon (`PolygonLabels`) controls of a labelling config.

    Raises LabelConfigError for XML that does not parse, a config with no such control, a control with no label or
    whose `toName` names no `Image`.
    """
    if not isinstance(xml, str) or not xml.strip():
        raise LabelConfigError("the project has no labelling config")
    try:
        root = ElementTree.fromstring(xml)
    except ElementTree.ParseError as error:
        raise LabelConfigError(f"the labelling config is not valid XML ({error})") from None
    images = {
        node.get("name"): (node.get("value") or "").lstrip("$")
        for node in root.iter()
        if node.tag.lower() == "image" and node.get("name")
    }
    controls = []
    for node in root.iter():
        kind = CONTROL_TYPES.get(node.tag.lower())
        if kind is None:
            continue
        name, to_name = node.get("name"), node.get("toName")
        labels = tuple(dict.fromkeys(item.get("value") for item in node if item.tag == "Label" and item.get("value")))
        if not labels:
            raise LabelConfigError(f"the {node.tag} control {name!r} has no <Label value=...>")
        if to_name not in images or not images[to_name]:
            raise LabelConfigError(f"the {node.tag} control {name!r} draws on {to_name!r}, which is no "
                                   "<Image value='$...'>")
        controls.append(Control(name, kind, to_name, images[to_name], labels))
    if not controls:
        raise LabelConfigError(
            "the labelling config has no BrushLabels or PolygonLabels control: the backend learns from brush masks "
            "and polygons, and predicts them"
        )
    images_used = sorted({c.to_name for c in controls})
    if len(images_used) > 1:
        raise LabelConfigError(f"the brush and polygon controls draw on several images ({', '.join(images_used)}): "
                               "the backend learns from one image per task")
    return LabelConfig(xml, tuple(controls))
