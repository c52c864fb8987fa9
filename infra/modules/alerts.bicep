// Alert rules of the relay (docs/alerts.md), deployed by main.bicep only when enableAlerts is true.
// Log search alerts (scheduled query rules) over the Application Insights component: every signal
// is an OpenTelemetry metric the app emits (shared/telemetry.py), stored in `customMetrics` with
// its attributes in `customDimensions`. tests/test_alerts.py checks every metric name and
// attribute these queries read against what the code records. The queue and account gauges come
// from the `sample_health` timer (every 5 minutes; main.bicep enables it with the alerts).

@description('Azure region of the alert rules (the action group is global).')
param location string

@description('Tags applied to every resource.')
param tags object = {}

@description('Suffix of the resource names (main.bicep: resourceToken).')
param resourceToken string

@description('Resource id of the Application Insights component the app sends telemetry to.')
param applicationInsightsId string

@description('Address the action group e-mails; empty: the alerts fire in the portal only.')
param alertEmail string = ''

@description('Name of the mail queue.')
param mailQueueName string

@description('Name of its poison queue.')
param poisonQueueName string

@description('The oldest visible message on the mail queue older than this many minutes raises an alert.')
@minValue(5)
param oldestMessageMinutes int = 30

@description('The delivery trace (confirm_delivery timer) is on: only then is a missing run an alert.')
param deliveryTraceEnabled bool = false

// ---------------------------------------------------------------- queries (KQL over customMetrics)

// {0}: the poison queue. Its depth as the sample_health timer last read it.
var kqlPoisonQueue = '''
customMetrics
| where name == "hve_relay.queue.depth"
| extend queue = tostring(customDimensions["queue"])
| where queue == "{0}"
| project timestamp, queue, depth = value
'''

// Requests recorded dead: by the send stage (attempts or age exhausted, a permanent refusal
// after acceptance) and by purge_expired (lost in flight, lost in queue).
var kqlDeadRequest = '''
customMetrics
| where name == "hve_relay.messages"
| extend outcome = tostring(customDimensions["outcome"]), account = tostring(customDimensions["account"])
| where outcome == "dead"
| project timestamp, account, dead = value
'''

// One row per account unhealthy in every sample of the last 15 minutes and in the last sample
// before them: out of rotation for more than 15 minutes (one failed authentication rests an
// account for ACCOUNT_UNHEALTHY_SECONDS, 900 by default; still unhealthy after that means HVE
// refused it again).
var kqlAccountUnhealthy = '''
let threshold = 15m;
customMetrics
| where timestamp > ago(threshold + 15m)
| where name == "hve_relay.account.unhealthy"
| extend account = tostring(customDimensions["account"])
| summarize last_healthy = maxif(timestamp, value == 0), last_before = maxif(timestamp, timestamp <= ago(threshold)), recent = countif(timestamp > ago(threshold)), timestamp = max(timestamp) by account
| where recent > 0 and isnotnull(last_before) and (isnull(last_healthy) or last_healthy < last_before)
'''

// {0}: the mail queue. Minutes since the oldest visible message was put on it.
var kqlOldestMessage = '''
customMetrics
| where name == "hve_relay.queue.oldest_age"
| extend queue = tostring(customDimensions["queue"])
| where queue == "{0}"
| project timestamp, queue, oldest_minutes = value / 60
'''

// Finished reconciliations (complete, or stopped by a budget); none in the window is the alert.
var kqlDeliveryTraceRuns = '''
customMetrics
| where name == "hve_relay.delivery_trace.runs"
| extend result = tostring(customDimensions["result"])
| project timestamp, result, runs = value
'''

// ---------------------------------------------------------------- action group

resource actionGroup 'Microsoft.Insights/actionGroups@2023-01-01' = {
  name: 'ag-${resourceToken}'
  location: 'global'
  tags: tags
  properties: {
    groupShortName: 'hve-relay'
    enabled: true
    emailReceivers: empty(alertEmail) ? [] : [
      {
        name: 'operators'
        emailAddress: alertEmail
        useCommonAlertSchema: true
      }
    ]
  }
}

// ---------------------------------------------------------------- rules

resource poisonQueue 'Microsoft.Insights/scheduledQueryRules@2022-06-15' = {
  name: 'alert-${resourceToken}-poison-queue'
  location: location
  tags: tags
  properties: {
    displayName: 'hve-relay: messages on the poison queue'
    description: 'The poison queue (${poisonQueueName}) holds a message: a request the Functions host gave up on after maxDequeueCount deliveries. Inspect with python -m tools.poison.'
    severity: 2
    enabled: true
    evaluationFrequency: 'PT5M'
    windowSize: 'PT15M'
    scopes: [
      applicationInsightsId
    ]
    criteria: {
      allOf: [
        {
          query: format(kqlPoisonQueue, poisonQueueName)
          timeAggregation: 'Maximum'
          metricMeasureColumn: 'depth'
          operator: 'GreaterThan'
          threshold: 0
          failingPeriods: {
            numberOfEvaluationPeriods: 1
            minFailingPeriodsToAlert: 1
          }
        }
      ]
    }
    autoMitigate: true
    actions: {
      actionGroups: [
        actionGroup.id
      ]
    }
  }
}

resource deadRequest 'Microsoft.Insights/scheduledQueryRules@2022-06-15' = {
  name: 'alert-${resourceToken}-dead-request'
  location: location
  tags: tags
  properties: {
    displayName: 'hve-relay: a request was recorded dead'
    description: 'At least one request was recorded dead in the last hour (python -m tools.ledger show <id> gives the reason).'
    severity: 2
    enabled: true
    evaluationFrequency: 'PT15M'
    windowSize: 'PT1H'
    scopes: [
      applicationInsightsId
    ]
    criteria: {
      allOf: [
        {
          query: kqlDeadRequest
          timeAggregation: 'Total'
          metricMeasureColumn: 'dead'
          operator: 'GreaterThan'
          threshold: 0
          failingPeriods: {
            numberOfEvaluationPeriods: 1
            minFailingPeriodsToAlert: 1
          }
        }
      ]
    }
    autoMitigate: true
    actions: {
      actionGroups: [
        actionGroup.id
      ]
    }
  }
}

resource accountUnhealthy 'Microsoft.Insights/scheduledQueryRules@2022-06-15' = {
  name: 'alert-${resourceToken}-account-unhealthy'
  location: location
  tags: tags
  properties: {
    displayName: 'hve-relay: an HVE account unhealthy for more than 15 minutes'
    description: 'An HVE account has been out of rotation after failed authentication for more than 15 minutes: check its password in Key Vault or its Add-HVEAppAccess (GET /api/status shows the last problem).'
    severity: 1
    enabled: true
    evaluationFrequency: 'PT5M'
    windowSize: 'PT30M'
    scopes: [
      applicationInsightsId
    ]
    criteria: {
      allOf: [
        {
          query: kqlAccountUnhealthy
          timeAggregation: 'Count'
          dimensions: [
            {
              name: 'account'
              operator: 'Include'
              values: [
                '*'
              ]
            }
          ]
          operator: 'GreaterThan'
          threshold: 0
          failingPeriods: {
            numberOfEvaluationPeriods: 1
            minFailingPeriodsToAlert: 1
          }
        }
      ]
    }
    autoMitigate: true
    actions: {
      actionGroups: [
        actionGroup.id
      ]
    }
  }
}

resource oldestMessage 'Microsoft.Insights/scheduledQueryRules@2022-06-15' = {
  name: 'alert-${resourceToken}-oldest-message'
  location: location
  tags: tags
  properties: {
    displayName: 'hve-relay: the oldest queued message is older than ${oldestMessageMinutes} minutes'
    description: 'A message visible on ${mailQueueName} has waited more than ${oldestMessageMinutes} minutes: the relay is not draining the queue (app stopped, every account resting, a backlog beyond the HVE limits).'
    severity: 2
    enabled: true
    evaluationFrequency: 'PT5M'
    windowSize: 'PT15M'
    scopes: [
      applicationInsightsId
    ]
    criteria: {
      allOf: [
        {
          query: format(kqlOldestMessage, mailQueueName)
          timeAggregation: 'Maximum'
          metricMeasureColumn: 'oldest_minutes'
          operator: 'GreaterThan'
          threshold: oldestMessageMinutes
          failingPeriods: {
            numberOfEvaluationPeriods: 1
            minFailingPeriodsToAlert: 1
          }
        }
      ]
    }
    autoMitigate: true
    actions: {
      actionGroups: [
        actionGroup.id
      ]
    }
  }
}

resource deliveryTraceStalled 'Microsoft.Insights/scheduledQueryRules@2022-06-15' = if (deliveryTraceEnabled) {
  name: 'alert-${resourceToken}-delivery-trace-stalled'
  location: location
  tags: tags
  properties: {
    displayName: 'hve-relay: no delivery-trace run finished in an hour'
    description: 'The confirm_delivery timer has not finished a reconciliation in the last hour: Graph refuses it (permission, the message-trace service principal), or it fails. Its errors are in the function\'s traces.'
    severity: 3
    enabled: true
    evaluationFrequency: 'PT15M'
    windowSize: 'PT1H'
    scopes: [
      applicationInsightsId
    ]
    criteria: {
      allOf: [
        {
          query: kqlDeliveryTraceRuns
          timeAggregation: 'Count'
          operator: 'LessThan'
          threshold: 1
          failingPeriods: {
            numberOfEvaluationPeriods: 1
            minFailingPeriodsToAlert: 1
          }
        }
      ]
    }
    autoMitigate: true
    actions: {
      actionGroups: [
        actionGroup.id
      ]
    }
  }
}

output actionGroupId string = actionGroup.id
output ruleNames array = concat([
  poisonQueue.name
  deadRequest.name
  accountUnhealthy.name
  oldestMessage.name
], deliveryTraceEnabled ? [
  'alert-${resourceToken}-delivery-trace-stalled'
] : [])
