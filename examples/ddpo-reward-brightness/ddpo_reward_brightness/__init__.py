"""A third-party ddpo reward plugin, the example of the plugin guide: mean pixel brightness."""

import ddpo


class Brightness(ddpo.Reward):
    """Mean pixel value, raised to `power`."""

    name = "brightness"

    class Options(ddpo.Options):  # pydantic model, extra keys forbidden
        power: float = 1.0
        """Exponent applied to the mean brightness."""

    def __call__(self, images, prompts, metadata):
        # images: float tensor (B, 3, H, W) in [0, 1]; prompts: list[str]; metadata: list[dict]
        return images.mean(dim=(1, 2, 3)) ** self.options.power


@ddpo.hookimpl
def register_rewards(register):
    register(Brightness)
