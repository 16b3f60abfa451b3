-- Argo CD health check for kubeinfer.dev/InferenceModel (resource.customizations.health).
-- Healthy: the operator saw the latest spec and the Ready condition is True.
-- Degraded: the Degraded condition is True, or the phase is Failed/Degraded.
-- Progressing: anything else (no status yet, an older generation observed, pods loading).
local hs = {}
hs.status = "Progressing"
hs.message = "Waiting for the kubeinfer operator to report status"

if obj.status == nil then
  return hs
end

local status = obj.status
local generation = obj.metadata and obj.metadata.generation
if generation ~= nil and (status.observedGeneration == nil or status.observedGeneration < generation) then
  hs.message = "Waiting for the operator to observe generation " .. tostring(generation)
  return hs
end

local conditions = {}
if status.conditions ~= nil then
  for _, condition in ipairs(status.conditions) do
    conditions[condition.type] = condition
  end
end

local function describe(condition, fallback)
  if condition ~= nil and condition.message ~= nil and condition.message ~= "" then
    return condition.message
  end
  if condition ~= nil and condition.reason ~= nil and condition.reason ~= "" then
    return condition.reason
  end
  return fallback
end

local degraded = conditions["Degraded"]
if (degraded ~= nil and degraded.status == "True") or status.phase == "Failed" or status.phase == "Degraded" then
  hs.status = "Degraded"
  hs.message = describe(degraded, "InferenceModel phase is " .. tostring(status.phase))
  return hs
end

local ready = conditions["Ready"]
if ready ~= nil and ready.status == "True" then
  hs.status = "Healthy"
  local readyReplicas = status.readyReplicas or 0
  local replicas = status.replicas or readyReplicas
  hs.message = describe(ready, "Ready") .. " (" .. tostring(readyReplicas) .. "/" .. tostring(replicas) .. " replicas ready)"
  return hs
end

hs.message = describe(conditions["Progressing"], describe(ready, "InferenceModel phase is " .. tostring(status.phase or "Pending")))
return hs
