"""The super-link routing table: which route token sends its query group to which decoder, with how many queries.

This module is the only place where route tokens, placeholder tokens and query counts are named. Everything else
reads them from a :class:`RouteTable` (or from the tensors of its :class:`BoundRoutes`).

A route token in the text is always followed by its ``K`` placeholder tokens: ``[EMB][EMB2]...[EMB{K}]`` when
``K <= 8`` and ``[EMB]`` repeated ``K`` times otherwise (the official convention). The placeholders' embeddings are
replaced by the rows of the route's query table (``nn.Embedding(K, C)`` named ``emb_embeddings_<table>``).
A route's K is its ``num_embs`` (the official name: ``num_embs=4`` for the perception routes, ``num_embs_gen=64``
for generation and editing); it is the only place K is set, every decoder takes its K from its routes.

Example config (YAML):

.. code-block:: yaml

    routes:
      - {token: "[DET]", decoder: gdino, num_embs: 4, table: det}
      - {token: "[POSE]", decoder: keypoint, num_embs: 4, table: pose, absorbs: ["[DET]"]}
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import torch

__all__ = [
    "LEGACY_K_KEY", "PLACEHOLDER_TOKENS", "DEFAULT_ROUTES", "Route", "RouteTable", "BoundRoutes", "placeholder_sequence",
]

LEGACY_K_KEY = "num_queries"  # the name older configs and saved models give a route's num_embs

PLACEHOLDER_TOKENS: tuple[str, ...] = ("[EMB]",) + tuple(f"[EMB{i}]" for i in range(2, 9))

# The official table, in the official token-id order ([DET] [GRD] [SEG] [POSE] [GEN] [EDIT]).
DEFAULT_ROUTES: tuple[dict[str, Any], ...] = (
    {"token": "[DET]", "decoder": "gdino", "num_embs": 4, "table": "det",
     "tasks": ["det", "instance_seg", "interactive", "grounded_caption"]},
    {"token": "[GRD]", "decoder": "gdino", "num_embs": 4, "table": "det", "tasks": ["rec", "res"]},
    {"token": "[SEG]", "decoder": "gdino", "num_embs": 4, "table": "det", "tasks": ["semantic_seg"]},
    {"token": "[POSE]", "decoder": "keypoint", "num_embs": 4, "table": "pose", "absorbs": ["[DET]"], "tasks": ["pose"]},
    {"token": "[GEN]", "decoder": "sd", "num_embs": 64, "table": "gen", "tasks": ["t2i"]},
    {"token": "[EDIT]", "decoder": "ip2p", "num_embs": 64, "table": "edit", "tasks": ["edit"]},
)


def placeholder_sequence(num_embs: int) -> tuple[str, ...]:
    """The placeholder tokens that follow a route token with ``num_embs`` queries.

    Args:
        num_embs: K.
    Returns:
        ``("[EMB]", "[EMB2]", ..., "[EMB{K}]")`` for K <= 8, else ``("[EMB]",) * K``.
    """
    if num_embs <= len(PLACEHOLDER_TOKENS):
        return PLACEHOLDER_TOKENS[:num_embs]
    return (PLACEHOLDER_TOKENS[0],) * num_embs


@dataclass(frozen=True)
class Route:
    """One route.

    Attributes:
        token: the route token, e.g. ``"[DET]"``.
        decoder: registry name of the decoder that receives its query groups.
        num_embs: K, the number of query embeddings spliced after the token.
        table: name of the query table (``emb_embeddings_<table>``); routes may share a table.
        absorbs: route tokens whose groups go to this route's decoder in samples that contain this route.
        tasks: the dataset tasks whose answers use this route (templates look routes up by task).
    """

    token: str
    decoder: str
    num_embs: int
    table: str
    absorbs: tuple[str, ...] = ()
    tasks: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in ("token", "decoder", "table"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise ValueError(f"route {self.token!r}: field {name!r} must be a non-empty string, got {value!r}")
        if isinstance(self.num_embs, bool) or not isinstance(self.num_embs, int) or self.num_embs < 1:
            raise ValueError(f"route {self.token!r}: num_embs must be a positive int, got {self.num_embs!r}")
        if isinstance(self.absorbs, str):
            raise ValueError(f"route {self.token!r}: absorbs must be a list of tokens, got the string {self.absorbs!r}")
        object.__setattr__(self, "absorbs", tuple(self.absorbs))
        object.__setattr__(self, "tasks", tuple(self.tasks))


class RouteTable:
    """An ordered, validated set of :class:`Route` s.

    Rules: tokens are unique and are not placeholders; all routes of one table share K; all routes of one decoder
    share K; an absorbed token exists, has the absorber's K, is absorbed by at most one route, and an absorbing route
    is not itself absorbed.

    Args:
        routes: the routes, in order (the order of ``route_tokens``; tables and decoders in order of first use).
    """

    def __init__(self, routes: Iterable[Route]) -> None:
        self.routes: tuple[Route, ...] = tuple(routes)
        self._by_token: dict[str, Route] = {}
        for route in self.routes:
            if not isinstance(route, Route):
                raise TypeError(f"expected Route, got {type(route).__name__}")
            if route.token in self._by_token:
                raise ValueError(f"duplicate route token {route.token!r}")
            if route.token in PLACEHOLDER_TOKENS:
                raise ValueError(f"route token {route.token!r} is a placeholder token")
            self._by_token[route.token] = route
        self._check_shared_k("table")
        self._check_shared_k("decoder")
        self._check_absorbs()

    def _check_shared_k(self, attr: str) -> None:
        seen: dict[str, Route] = {}
        for route in self.routes:
            first = seen.setdefault(getattr(route, attr), route)
            if first.num_embs != route.num_embs:
                raise ValueError(
                    f"routes {first.token!r} (num_embs={first.num_embs}) and {route.token!r} "
                    f"(num_embs={route.num_embs}) share {attr} {getattr(route, attr)!r} but differ in num_embs"
                )

    def _check_absorbs(self) -> None:
        absorbed_by: dict[str, str] = {}
        for route in self.routes:
            for token in route.absorbs:
                if token not in self._by_token:
                    raise ValueError(f"route {route.token!r} absorbs unknown route token {token!r}")
                if token == route.token:
                    raise ValueError(f"route {route.token!r} absorbs itself")
                if token in absorbed_by:
                    raise ValueError(
                        f"route token {token!r} is absorbed by both {absorbed_by[token]!r} and {route.token!r}"
                    )
                if self._by_token[token].num_embs != route.num_embs:
                    raise ValueError(
                        f"route {route.token!r} (num_embs={route.num_embs}) absorbs {token!r} "
                        f"(num_embs={self._by_token[token].num_embs}); they must share num_embs"
                    )
                absorbed_by[token] = route.token
        for route in self.routes:
            if route.absorbs and route.token in absorbed_by:
                raise ValueError(
                    f"route {route.token!r} absorbs others and is absorbed by {absorbed_by[route.token]!r}"
                )

    @classmethod
    def default(cls) -> RouteTable:
        """The official table: det/seg/grd -> gdino (K 4), pose -> keypoint (K 4), gen -> sd and edit -> ip2p (K 64)."""
        return cls.from_config(DEFAULT_ROUTES)

    @classmethod
    def from_config(cls, entries: Sequence[Mapping[str, Any]]) -> RouteTable:
        """Build a table from plain data (e.g. a YAML list of dicts).

        Each entry has ``token``, ``decoder``, ``num_embs`` and optionally ``table`` (default: the decoder name),
        ``absorbs`` (a list of tokens) and ``tasks``. ``num_queries``, the name older configs and saved models use
        for ``num_embs``, is read as ``num_embs``.

        Args:
            entries: the route dicts, in order.
        Returns:
            The validated table.
        """
        if isinstance(entries, (str, Mapping)) or not isinstance(entries, Sequence):
            raise ValueError(f"routes must be a list of route dicts, got {type(entries).__name__}")
        known = {f.name for f in fields(Route)}
        routes = []
        for i, entry in enumerate(entries):
            if not isinstance(entry, Mapping):
                raise ValueError(f"routes[{i}] must be a dict, got {type(entry).__name__}")
            data = _without_legacy_k(i, entry)
            unknown = sorted(set(data) - known)
            if unknown:
                raise ValueError(f"routes[{i}]: unknown key(s) {unknown}; known keys: {sorted(known)}")
            missing = sorted({"token", "decoder", "num_embs"} - set(data))
            if missing:
                raise ValueError(f"routes[{i}]: missing key(s) {missing}")
            data.setdefault("table", data["decoder"])
            data["absorbs"] = tuple(data.get("absorbs") or ())
            data["tasks"] = tuple(data.get("tasks") or ())
            routes.append(Route(**data))
        return cls(routes)

    def to_config(self) -> list[dict[str, Any]]:
        """The table as plain data; ``RouteTable.from_config(t.to_config()) == t``."""
        return [
            {"token": r.token, "decoder": r.decoder, "num_embs": r.num_embs, "table": r.table,
             "absorbs": list(r.absorbs), "tasks": list(r.tasks)}
            for r in self.routes
        ]

    def without_decoders(self, names: Iterable[str]) -> RouteTable:
        """A copy without the routes of the named decoders (absorb references to dropped tokens are removed).

        Args:
            names: decoder names; each must be in ``decoders``.
        Returns:
            The reduced table.
        """
        names = set(names)
        unknown = sorted(names - set(self.decoders))
        if unknown:
            raise ValueError(f"unknown decoder(s) {unknown}; table decoders: {self.decoders}")
        kept = [r for r in self.routes if r.decoder not in names]
        tokens = {r.token for r in kept}
        return RouteTable(replace(r, absorbs=tuple(t for t in r.absorbs if t in tokens)) for r in kept)

    @property
    def route_tokens(self) -> tuple[str, ...]:
        """Route tokens, in table order."""
        return tuple(r.token for r in self.routes)

    @property
    def placeholder_tokens(self) -> tuple[str, ...]:
        """The eight placeholder tokens ``[EMB]``, ``[EMB2]`` ... ``[EMB8]`` (always all eight, official vocabulary)."""
        return PLACEHOLDER_TOKENS

    @property
    def tables(self) -> dict[str, int]:
        """Query table name -> K, in order of first use (the order of the concatenated query weight)."""
        return _first_use((r.table, r.num_embs) for r in self.routes)

    @property
    def decoders(self) -> list[str]:
        """Decoder names, in order of first use."""
        return list(_first_use((r.decoder, r.num_embs) for r in self.routes))

    def decoder_num_embs(self, decoder: str) -> int:
        """K of the named decoder."""
        for route in self.routes:
            if route.decoder == decoder:
                return route.num_embs
        raise KeyError(f"unknown decoder {decoder!r}; table decoders: {self.decoders}")

    def route(self, token: str) -> Route:
        """The route of ``token``."""
        if token not in self._by_token:
            raise KeyError(f"unknown route token {token!r}; route tokens: {list(self.route_tokens)}")
        return self._by_token[token]

    def route_for_task(self, task: str) -> str:
        """The route token whose answers serve ``task`` (e.g. ``"det"``, ``"rec"``, ``"pose"``, ``"t2i"``)."""
        for route in self.routes:
            if task in route.tasks:
                return route.token
        known = sorted({t for r in self.routes for t in r.tasks})
        raise KeyError(f"no route serves task {task!r}; tasks with a route: {known}")

    def answer_suffix(self, token: str) -> str:
        """The route token followed by its placeholders, e.g. ``"[DET][EMB][EMB2][EMB3][EMB4]"``."""
        return token + "".join(placeholder_sequence(self.route(token).num_embs))

    def bind(self, token_to_id: Callable[[str], int]) -> BoundRoutes:
        """Resolve the tokens to ids and build the lookup tensors used by splice, gather and decoding.

        Args:
            token_to_id: e.g. ``tokenizer.convert_tokens_to_ids``.
        Returns:
            The bound table (CPU tensors; use ``.to(device)``).
        """
        return BoundRoutes.build(self, token_to_id)

    def __len__(self) -> int:
        return len(self.routes)

    def __iter__(self) -> Iterator[Route]:
        return iter(self.routes)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RouteTable) and self.routes == other.routes

    def __hash__(self) -> int:
        return hash(self.routes)

    def __repr__(self) -> str:
        return f"RouteTable({list(self.routes)!r})"


def _without_legacy_k(index: int, entry: Mapping[str, Any]) -> dict[str, Any]:
    """A route dict with its legacy ``num_queries`` key read as ``num_embs``.

    Args:
        index: the entry's position in the route list (for errors).
        entry: the route dict as written.
    Returns:
        A new dict without ``num_queries``.
    Raises:
        ValueError: ``num_queries`` and ``num_embs`` are both given and differ.
    """
    data = dict(entry)
    if LEGACY_K_KEY not in data:
        return data
    legacy = data.pop(LEGACY_K_KEY)
    if data.setdefault("num_embs", legacy) != legacy:
        raise ValueError(f"routes[{index}] ({data.get('token')!r}): num_queries={legacy!r} (the old name of num_embs) "
                         f"and num_embs={data['num_embs']!r} differ; keep only num_embs")
    return data


def _first_use(pairs: Iterable[tuple[str, int]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for name, k in pairs:
        out.setdefault(name, k)
    return out


@dataclass(repr=False)
class BoundRoutes:
    """A :class:`RouteTable` with token ids resolved, as tensors (R routes, P = 8 placeholders).

    Attributes:
        table: the route table.
        route_ids: ``[R]`` token id of each route.
        num_embs: ``[R]`` K of each route.
        table_offset: ``[R]`` first row of the route's table in the concatenated query weight.
        decoder_index: ``[R]`` index into ``table.decoders``.
        absorber: ``[R]`` index of the route that absorbs this route, -1 if none.
        placeholder_ids: ``[P]`` ids of ``[EMB]`` ... ``[EMB8]``.
        query_ids: ``[R, K_max]`` the placeholder id expected at each query slot of each route (-1 past K).
        id_to_route: ``[V]`` route index of each token id up to the largest special id, -1 elsewhere.
        id_is_placeholder: ``[V]`` True at placeholder ids.
        k_by_id: route token id -> K (plain dict, for tokenisation-time code).
    """

    table: RouteTable
    route_ids: torch.Tensor
    num_embs: torch.Tensor
    table_offset: torch.Tensor
    decoder_index: torch.Tensor
    absorber: torch.Tensor
    placeholder_ids: torch.Tensor
    query_ids: torch.Tensor
    id_to_route: torch.Tensor
    id_is_placeholder: torch.Tensor
    k_by_id: dict[int, int] = field(default_factory=dict)

    @classmethod
    def build(cls, table: RouteTable, token_to_id: Callable[[str], int]) -> BoundRoutes:
        """See :meth:`RouteTable.bind`."""
        ids: dict[str, int] = {}
        for token in table.route_tokens + PLACEHOLDER_TOKENS:
            value = token_to_id(token)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"token {token!r} has no valid id (got {value!r}); add it to the tokenizer")
            ids[token] = value
        by_id: dict[int, str] = {}
        for token, value in ids.items():
            if value in by_id:
                raise ValueError(
                    f"tokens {by_id[value]!r} and {token!r} map to the same id {value}; "
                    "are they added to the tokenizer?"
                )
            by_id[value] = token
        tables = table.tables
        offsets = dict(zip(tables, [sum(list(tables.values())[:i]) for i in range(len(tables))]))
        decoders = table.decoders
        index = {r.token: i for i, r in enumerate(table.routes)}
        absorber = [-1] * len(table)
        for r in table.routes:
            for token in r.absorbs:
                absorber[index[token]] = index[r.token]
        k_max = max((r.num_embs for r in table.routes), default=0)
        query_ids = torch.full((len(table), k_max), -1, dtype=torch.long)
        for i, r in enumerate(table.routes):
            query_ids[i, : r.num_embs] = torch.tensor([ids[t] for t in placeholder_sequence(r.num_embs)])
        route_ids = torch.tensor([ids[r.token] for r in table.routes], dtype=torch.long)
        id_to_route = torch.full((max(ids.values()) + 1,), -1, dtype=torch.long)
        id_to_route[route_ids] = torch.arange(len(table))
        placeholder_ids = torch.tensor([ids[t] for t in PLACEHOLDER_TOKENS], dtype=torch.long)
        id_is_placeholder = torch.zeros(id_to_route.shape, dtype=torch.bool).index_fill_(0, placeholder_ids, True)
        return cls(
            table=table,
            route_ids=route_ids,
            num_embs=torch.tensor([r.num_embs for r in table.routes], dtype=torch.long),
            table_offset=torch.tensor([offsets[r.table] for r in table.routes], dtype=torch.long),
            decoder_index=torch.tensor([decoders.index(r.decoder) for r in table.routes], dtype=torch.long),
            absorber=torch.tensor(absorber, dtype=torch.long),
            placeholder_ids=placeholder_ids,
            query_ids=query_ids,
            id_to_route=id_to_route,
            id_is_placeholder=id_is_placeholder,
            k_by_id={ids[r.token]: r.num_embs for r in table.routes},
        )

    def __repr__(self) -> str:
        ids = dict(zip(self.table.route_tokens, self.route_ids.tolist()))
        return f"BoundRoutes(routes={ids}, tables={self.table.tables}, device={self.device})"

    @property
    def total_queries(self) -> int:
        """Rows of the concatenated query weight (sum of the tables' K)."""
        return sum(self.table.tables.values())

    @property
    def device(self) -> torch.device:
        return self.route_ids.device

    def to(self, device: torch.device | str) -> BoundRoutes:
        """A copy with all tensors on ``device`` (self when already there)."""
        device = torch.device(device)
        if self.device == device:
            return self
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        for name, value in moved.items():
            if isinstance(value, torch.Tensor):
                moved[name] = value.to(device)
        return BoundRoutes(**moved)

    def route_index(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Route index of every id (-1 for ids that are not route tokens); same shape as ``input_ids``."""
        return torch.where(self._inside(input_ids), self._lookup(self.id_to_route, input_ids), -1)

    def is_placeholder(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Bool mask of placeholder ids; same shape as ``input_ids``."""
        return self._inside(input_ids) & self._lookup(self.id_is_placeholder, input_ids)

    def _inside(self, input_ids: torch.Tensor) -> torch.Tensor:
        return (input_ids >= 0) & (input_ids < self.id_to_route.numel())

    @staticmethod
    def _lookup(table: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """``table[input_ids]`` for ids clamped into range (a flat ``index_select``: fast on CPU)."""
        index = input_ids.clamp(0, table.numel() - 1).reshape(-1)
        return table.to(input_ids.device).index_select(0, index).view(input_ids.shape)
