// Outcome events (docs/producers.md, "Outcome events"): the Event Grid custom topic the app publishes
// CloudEvents to, and the app identity's "EventGrid Data Sender" role on it. main.bicep deploys this
// module only when enableEventGridTopic is true and sets EVENTS_TOPIC_ENDPOINT from its output. The
// events queue (EVENTS_QUEUE) needs nothing here: it is in the app's storage account, where the app
// identity already has Storage Queue Data Contributor (modules/rbac.bicep).

@description('Azure region of the topic.')
param location string

@description('Tags applied to every resource.')
param tags object = {}

@description('Name of the Event Grid custom topic.')
param topicName string

@description('Principal id of the app\'s user-assigned managed identity (it publishes with its Entra token).')
param identityPrincipalId string

var eventGridDataSender = 'd5a91429-5739-47e2-a06b-3470a27159e7'

resource topic 'Microsoft.EventGrid/topics@2022-06-15' = {
  name: topicName
  location: location
  tags: tags
  // Its own identity, for delivering to subscribers' endpoints with Entra auth (a subscription's
  // deliveryWithResourceIdentity), so no subscriber needs a key either.
  identity: {
    type: 'SystemAssigned'
  }
  properties: {
    // The app publishes CloudEvents 1.0 (shared/schema/event.v1.json).
    inputSchema: 'CloudEventSchemaV1_0'
    // Entra tokens only: no access keys or SAS tokens to leak or rotate.
    disableLocalAuth: true
    publicNetworkAccess: 'Enabled'
    minimumTlsVersionAllowed: '1.2'
  }
}

// The app publishes to this topic, nothing else.
resource appEventSender 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(topic.id, identityPrincipalId, eventGridDataSender)
  scope: topic
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', eventGridDataSender)
    principalId: identityPrincipalId
    principalType: 'ServicePrincipal'
    description: 'hve-relay: publish outcome events to ${topicName}'
  }
}

output endpoint string = topic.properties.endpoint
output name string = topic.name
output id string = topic.id
