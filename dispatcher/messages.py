"""Turn a stage, a firing and a recipient into the exact message that will be sent.

Shared by `check`, `preview`, `plan` and materialisation, so what an operator previews is what
recipients get.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

from dispatcher.audience import AudienceSource, Recipient
from dispatcher.config.loader import Config, StageTemplates
from dispatcher.config.models import CampaignConfig, StageConfig
from dispatcher.plan import Firing
from dispatcher.slogans import Slogan, pick_slogan
from dispatcher.sms import analyse, compose


@dataclass(frozen=True, slots=True)
class RenderedMessage:
    """A message ready for one address: text, and for SMS its encoding and segment count."""

    body: str
    subject: str | None
    html: str | None
    encoding: str
    segments: int


@dataclass(frozen=True, slots=True)
class StageFiring:
    """Everything needed to render a stage's messages for one firing (computed once per firing)."""

    campaign: CampaignConfig
    stage: StageConfig
    firing: Firing
    templates: StageTemplates
    slogan: Slogan | None
    kind: str
    price_per_segment: Decimal

    @property
    def fired_at_local(self) -> datetime:
        return self.firing.at.astimezone(self.campaign.tz)

    def base_variables(self) -> dict[str, Any]:
        return {
            "campaign": {"id": self.campaign.id, "name": self.campaign.campaign.name},
            "stage": {"id": self.stage.id, "name": self.stage.name or self.stage.id},
            "slogan": self.slogan.text if self.slogan else "",
            "slogan_id": self.slogan.id if self.slogan else "",
            "fired_at": self.fired_at_local,
        }

    def render(self, recipient: Recipient) -> RenderedMessage:
        """Render this firing's message for one recipient (raises TemplateError on a bad row)."""
        variables = {**recipient.variables, "address": recipient.address, **self.base_variables()}
        body = self.templates.body.render(variables)
        subject = self.templates.subject.render(variables) if self.templates.subject else None
        html = self.templates.html.render(variables) if self.templates.html else None
        if self.kind == "phone":
            info = self.campaign.campaign
            body = compose(body, signature=info.signature, unsubscribe=info.unsubscribe)
            sms = analyse(body)
            return RenderedMessage(body, subject, html, sms.encoding, sms.segments)
        return RenderedMessage(body, subject, html, "text", 1)


def stage_firing(
    config: Config, campaign: CampaignConfig, stage: StageConfig, firing: Firing
) -> StageFiring:
    """Bind a stage to one of its firings: pick its slogan, find its templates and channel price."""
    slogan = None
    if stage.slogans is not None:
        choice = stage.slogans
        slogan_set = config.slogan_sets[choice.set]
        slogan = (
            slogan_set.get(choice.id)
            if choice.id
            else pick_slogan(
                slogan_set,
                order=choice.order,
                seed=choice.seed,
                firing_index=firing.index,
                ids=choice.ids,
            )
        )
    audience = campaign.audiences[stage.audience]
    channel = config.root.channels[stage.channel]
    return StageFiring(
        campaign=campaign,
        stage=stage,
        firing=firing,
        templates=config.templates[(campaign.id, stage.id)],
        slogan=slogan,
        kind=audience.kind,
        price_per_segment=channel.price_per_segment,
    )


def audience_source(campaign: CampaignConfig, audience_id: str) -> AudienceSource:
    """The audience's CSV description, with its path resolved beside the campaign file."""
    audience = campaign.audiences[audience_id]
    return AudienceSource(
        path=campaign.base_dir / audience.file,
        address_column=audience.address_column,
        kind=audience.kind,
        region=audience.region,
        encoding=audience.encoding,
        columns=dict(audience.columns),
        delimiter=audience.delimiter,
    )
