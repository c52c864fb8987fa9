// Flex Consumption plan and the Python function app. The app runs as the user-assigned
// identity only: host storage, the deployment package, Key Vault references and the code
// all authenticate with it. Every app setting comes from main.bicep (`appSettings`), which
// is checked against shared/settings.py by tests/test_infra.py.

@description('Azure region of the plan and the app.')
param location string

@description('Tags applied to every resource.')
param tags object = {}

@description('Name of the Flex Consumption plan.')
param planName string

@description('Name of the function app (also its host name).')
param appName string

@description('Resource id of the user-assigned managed identity the app runs as.')
param identityId string

@description('Blob endpoint of the storage account, e.g. https://st123.blob.core.windows.net/.')
param storageBlobEndpoint string

@description('Blob container that holds the deployment package.')
param deploymentContainerName string

@description('Python version of the Functions worker.')
@allowed([
  '3.11'
])
param pythonVersion string = '3.11'

@description('Most instances the app scales out to.')
@minValue(40)
@maxValue(1000)
param maximumInstanceCount int = 40

@description('Memory of one instance, in MB.')
@allowed([
  512
  2048
  4096
])
param instanceMemoryMB int = 2048

@description('Spread instances over availability zones (the region must support it for Flex Consumption; use zone-redundant storage with it).')
param zoneRedundant bool = false

@description('App settings (name -> value); the complete set, replacing any other.')
param appSettings object

@description('Client IP ranges (CIDR) allowed to reach the HTTP routes; empty: every address (function keys still required).')
param allowedClientIpRanges array = []

// Access restrictions of the app's HTTP front end: one Allow rule per range, then Deny for the rest.
// The deployment endpoint (scm) keeps its own (Entra-authenticated) access.
var ipRestrictions = [for (range, i) in allowedClientIpRanges: {
  name: 'client-${i}'
  ipAddress: range
  action: 'Allow'
  priority: 100 + i
}]

resource plan 'Microsoft.Web/serverfarms@2024-04-01' = {
  name: planName
  location: location
  tags: tags
  kind: 'functionapp'
  sku: {
    name: 'FC1'
    tier: 'FlexConsumption'
  }
  properties: {
    reserved: true
    zoneRedundant: zoneRedundant
  }
}

resource functionApp 'Microsoft.Web/sites@2024-04-01' = {
  name: appName
  location: location
  tags: union(tags, {
    'azd-service-name': 'relay'
  })
  kind: 'functionapp,linux'
  identity: {
    type: 'UserAssigned'
    userAssignedIdentities: {
      '${identityId}': {}
    }
  }
  properties: {
    serverFarmId: plan.id
    httpsOnly: true
    keyVaultReferenceIdentity: identityId
    siteConfig: {
      minTlsVersion: '1.2'
      scmMinTlsVersion: '1.2'
      http20Enabled: true
      ipSecurityRestrictions: ipRestrictions
      ipSecurityRestrictionsDefaultAction: empty(allowedClientIpRanges) ? 'Allow' : 'Deny'
      appSettings: [for setting in items(appSettings): {
        name: setting.key
        value: setting.value
      }]
    }
    functionAppConfig: {
      deployment: {
        storage: {
          type: 'blobContainer'
          value: '${storageBlobEndpoint}${deploymentContainerName}'
          authentication: {
            type: 'UserAssignedIdentity'
            userAssignedIdentityResourceId: identityId
          }
        }
      }
      scaleAndConcurrency: {
        maximumInstanceCount: maximumInstanceCount
        instanceMemoryMB: instanceMemoryMB
      }
      runtime: {
        name: 'python'
        version: pythonVersion
      }
    }
  }
}

// No FTP or SCM basic-auth publishing credentials: deployments authenticate with Entra ID.
// (These policies are what turns FTP off on Flex Consumption: siteConfig.ftpsState is deprecated there.)
resource ftpCredentials 'Microsoft.Web/sites/basicPublishingCredentialsPolicies@2024-04-01' = {
  parent: functionApp
  name: 'ftp'
  properties: {
    allow: false
  }
}

resource scmCredentials 'Microsoft.Web/sites/basicPublishingCredentialsPolicies@2024-04-01' = {
  parent: functionApp
  name: 'scm'
  properties: {
    allow: false
  }
}

output id string = functionApp.id
output name string = functionApp.name
output defaultHostName string = functionApp.properties.defaultHostName
